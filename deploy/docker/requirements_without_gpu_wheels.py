"""Print fieldline's dependencies from pyproject.toml, one per line, without torch and
onnxruntime: the Jetson image installs those from the Jetson wheel index (GPU builds) first.

Used by Dockerfile.edge-jetson: python3.11 requirements_without_gpu_wheels.py pyproject.toml
"""

import re
import sys
import tomllib

GPU_WHEELS = re.compile(r"^(torch|onnxruntime)\b")

with open(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
print("\n".join(d for d in deps if not GPU_WHEELS.match(d)))
