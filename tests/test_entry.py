"""The console script's entry: signals while the modules load."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ctrl_c_while_the_modules_load_is_one_line():
    """The console script (onnx_tucker.entry) catches SIGINT from its first line: during the half second numpy, scipy and
    tensorly load, Ctrl-C printed a KeyboardInterrupt traceback (or an ImportError one) instead of 'interrupted'."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for delay in (0.2, 0.35, 0.5):
        p = subprocess.Popen([sys.executable, "-c", "import sys; from onnx_tucker.entry import main; sys.exit(main())",
                              "inspect", str(ROOT / "models" / "cifar10_cnn.onnx")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert "Traceback" not in err, err
        assert p.returncode in (130, 0, -signal.SIGINT), (delay, p.returncode, err)  # 0: it had already finished


def test_a_signal_after_the_command_returned_does_not_change_its_exit_status():
    """SIGTERM during the interpreter's teardown (0.3 s after compress, 3 s after convert's TensorFlow) killed a finished,
    committed run with a silent 143 while its output stayed in place; the command's own status now stands."""
    code = ("import os, signal, sys\n"
            "import onnx_tucker.cli as cli\n"
            "cli.main = lambda: 0\n"
            "from onnx_tucker.entry import main\n"
            "status = main()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "sys.exit(status)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
