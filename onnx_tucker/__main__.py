import sys

from onnx_tucker.entry import main

sys.exit(main())
