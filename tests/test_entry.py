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
