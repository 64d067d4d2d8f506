"""imt: the installed name of this repository's packages.

A wheel (`pip install .`) holds `imt.pipeline`, `imt.train`, `imt.tools`, `imt.benchmarks` and the recipes as
`imt.recipes` (setup.cfg maps the repository's top-level folders under this one name), so nothing with a
generic name such as `train` or `tools` lands in site-packages. In a checkout (`PYTHONPATH=<repo>`, or
`python train/run.py`), this file lets the same names resolve to the top-level folders, which stay where
they are: the package's search path gets the repository root, the documented way to spread one package
over several folders (as pkgutil.extend_path does). Installed, there is no setup.cfg beside it and nothing
is added.
"""
from pathlib import Path as _Path

_root = _Path(__file__).resolve().parent.parent
if (_root / "setup.cfg").is_file() and (_root / "train" / "run.py").is_file():  # a checkout, not site-packages
    __path__.append(str(_root))
