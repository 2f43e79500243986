"""Packaging for keras-vae-attn: the library, its trainers and its exporters."""

from setuptools import find_packages, setup

setup(
    name="keras-vae-attn",
    version="0.1.0",
    description="Visually explaining variational autoencoders: latent attention, anomaly "
    "localization and the attention disentanglement loss, in TensorFlow/Keras 3.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(
        include=["keras_vae_attn*", "trainers*", "export*", "pipeline*", "bench*"]
    ),
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.10,<4",
        "numpy",
        "scikit-learn",
        "scipy",
        "matplotlib",
        "pillow",
        "tqdm",
        "tensorboard",
    ],
    extras_require={
        "export": ["tf2onnx>=1.17", "onnx", "onnxruntime"],
        # importlib_resources: tensorflow-datasets' etils imports it when loading, and an
        # install resolved without etils' extras lacks it
        "datasets": ["tensorflow-datasets", "importlib_resources"],
        "dev": [
            "pytest",
            "pytest-xdist",
            "ruff>=0.17,<0.18",  # `make lint`; rules and line length in pyproject.toml
            "tf2onnx>=1.17",
            "onnx",
            "onnxruntime",
            "tensorflow-datasets",
            "importlib_resources",
            # the tests parse the exported TF Serving warm-up records with its protos
            "tensorflow-serving-api>=2.21,<2.22",
        ],
    },
)
