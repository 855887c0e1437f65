import os
import re

from setuptools import find_packages, setup

# The version is written once, in ingest/__init__.py (`ingest --version` prints it).
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ingest", "__init__.py"),
          encoding="utf-8") as fh:
    VERSION = re.search(r'^__version__ = "([^"]+)"', fh.read(), re.M).group(1)

setup(
    name="ingest",
    version=VERSION,
    license="MIT",
    description="Mixpanel-compatible event ingestion server on eventlet, with a Kestrel-compatible queue",
    packages=find_packages(include=["ingest", "ingest.*"]),
    python_requires=">=3.11",
    # Exact pins live in requirements.txt (what `make run` installs); these ranges are the
    # versions the code is written against.
    install_requires=[
        "eventlet>=0.41,<0.42",
        "simplejson>=4.3,<5",
        "msgspec>=0.23,<0.24",
        "pybase64>=1.4,<1.5",
        "prometheus_client>=0.26,<0.27",
        "supervisor>=4.3,<5",
    ],
    entry_points={"console_scripts": ["ingest=ingest.cli:main"]},
)
