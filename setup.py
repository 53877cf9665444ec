import os
import shutil
from os import path

from setuptools import find_packages, setup

HERE = path.dirname(path.realpath(__file__))


def _link_configs():
    """
    Put the top-level ``configs/`` inside the package, so that an installed wheel finds them
    (``retinamask_d2/configs``). A symlink keeps one copy in the source tree.
    """
    source = path.join(HERE, "configs")
    destination = path.join(HERE, "retinamask_d2", "configs")
    if not path.isdir(source):
        return
    if path.islink(destination):
        os.unlink(destination)
    elif path.isdir(destination):
        shutil.rmtree(destination)
    try:
        os.symlink(source, destination)
    except OSError:
        shutil.copytree(source, destination)


_link_configs()

setup(
    name="retinamask_d2",
    version="0.1.0",
    description="RetinaMask (RetinaNet trained with a mask head, best matching and "
    "self-adjusting smooth L1) as a detectron2 extension",
    long_description=open(path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(exclude=("tests", "tests.*")),
    package_data={"retinamask_d2": ["configs/*.yaml", "configs/**/*.yaml"]},
    python_requires=">=3.9",
    # detectron2 is not on PyPI: install it from source first (see README.md).
    install_requires=[
        "torch>=2.0",
        "torchvision>=0.15",
        "fvcore>=0.1.5",
        "iopath>=0.1.7",
        "pycocotools>=2.0.2",
        "opencv-python-headless>=4.5",
        # Downloads the authors' released checkpoints from Google Drive (model zoo).
        "gdown>=6.5",
        # detectron2.model_zoo imports pkg_resources, which setuptools 81 removed.
        "setuptools<81",
    ],
    extras_require={
        # matplotlib: tests/test_plot_beta.py; pytest-random-order: the suite in any order.
        "test": ["pytest>=7", "matplotlib>=3.5", "pytest-random-order>=1.0"],
        "export": ["onnx>=1.14", "onnxruntime>=1.16"],
        # tools/plot_beta.py
        "plot": ["matplotlib>=3.5"],
    },
)
