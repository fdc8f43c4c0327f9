"""The one build step setup.cfg cannot say: the top-level configs/ ships inside the package as
pipeline/configs/ (package data), so an installed fpdiff (``pip install .``, a wheel) finds its
configs (``pipeline.config_files.CONFIG_DIR``) without the source tree. Metadata: setup.cfg."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["pipeline", "pipeline.*"]) + ["pipeline.configs"],
      package_dir={"pipeline.configs": "configs"},
      package_data={"pipeline.configs": ["*.yaml"]})
