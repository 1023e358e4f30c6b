"""Packaging for ioncore: the ``ion`` package, its resources and the ``twistd cc`` plugin."""

from setuptools import find_packages, setup

setup(
    name="ioncore",
    version="0.1.0",
    description="A Twisted capability container: lifecycle-managed processes talking by messages",
    python_requires=">=3.11",
    # twisted/plugins must not be a package (no __init__.py); it is shipped as a
    # namespace so that `twistd` finds the `cc` plugin (see Twisted's plugin howto).
    packages=find_packages(include=["ion", "ion.*"]) + ["twisted.plugins"],
    # An explicit root makes `pip install -e .` put this folder on sys.path (a .pth file)
    # rather than install an import hook, so twistd's plugin scan finds twisted/plugins/cc.py.
    package_dir={"": "."},
    package_data={"ion": ["py.typed", "services/records/*.proto", "services/records/*.pyi"], "twisted.plugins": ["cc.py"]},
    include_package_data=True,
    install_requires=[
        "twisted>=24.3",
        "msgpack>=1.0",
        "protobuf>=7.35.1",  # the gencode of ion/services/records (bin/gen-protos)
        "pika>=1.3",
        "treq>=23.11",
        "rich>=13",
        "prometheus_client>=0.20",  # the container's /metrics (ion/core/metrics.py)
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.2",
            "hypothesis>=6",
            # The fetch tests: HTTP repositories (treq), S3 (boto3) against moto's server on loopback.
            "treq>=23.11",
            "boto3>=1.28",
            "moto[server]>=5",
        ],
        # S3 repositories: boto3 is imported only when an s3:// repository is used.
        "s3": ["boto3>=1.28"],
        "dev": ["mypy>=1.8", "mypy-zope>=1.0", "ruff>=0.4"],
    },
    entry_points={
        "console_scripts": [
            "ion-cc=ion.core.tap:run_cc",
            "ion-deploy=ion.services.deploy.cli:main",
        ],
        # ion.testing's fixtures in any project that installs ioncore, without a conftest line.
        # Named as the module, so a conftest's pytest_plugins naming it too loads it once.
        "pytest11": [
            "ion.testing.pytest_plugin=ion.testing.pytest_plugin",
            "ion.testing.pytest_servers=ion.testing.pytest_servers",
        ],
    },
)
