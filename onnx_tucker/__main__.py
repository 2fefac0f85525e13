import sys

from onnx_tucker.cli import main

sys.exit(main())
