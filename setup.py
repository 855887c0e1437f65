from setuptools import find_packages, setup

setup(
    name="ingest",
    version="0.1.0",
    description="Mixpanel-compatible event ingestion server on eventlet, with a Kestrel-compatible queue",
    packages=find_packages(include=["ingest", "ingest.*"]),
    python_requires=">=3.11",
    # Exact pins live in requirements.txt (what `make run` installs); these ranges are the
    # versions the code is written against.
    install_requires=[
        "eventlet>=0.41,<0.42",
        "simplejson>=4.3,<5",
        "msgspec>=0.23,<0.24",
        "prometheus_client>=0.26,<0.27",
        "supervisor>=4.3,<5",
    ],
    entry_points={"console_scripts": ["ingest=ingest.cli:main"]},
)
