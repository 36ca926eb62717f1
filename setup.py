"""dsv3: pretrain DeepSeek-V3-style models with the DeepSeek-V3 recipe.

The repository root holds the folders the product is organised by; they install as one
namespace, ``dsv3`` (``dsv3.model`` is ``model/``, and so on), so nothing installs a top-level
package called ``data`` or ``model``.
"""
from setuptools import setup

SUBPACKAGES = ["model", "fp8", "parallel", "data", "train", "launch"]

setup(
    name="dsv3",
    version="0.1.0",
    description="Pretrain DeepSeek-V3-style models: MLA, DeepSeekMoE, MTP, FP8, DualPipe.",
    python_requires=">=3.10",
    packages=[f"dsv3.{name}" for name in SUBPACKAGES] + ["dsv3.recipes"],
    package_dir={**{f"dsv3.{name}": name for name in SUBPACKAGES}, "dsv3.recipes": "recipes"},
    package_data={"dsv3.recipes": ["*.yaml", "*/*.yaml"]},
    install_requires=[
        "torch>=2.10",
        "triton>=3.4; platform_system == 'Linux'",
        "numpy",
        "hydra-core>=1.3",
        "datasets>=3.0",
        "tokenizers>=0.20",
        "wandb>=0.19",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=8"],
    },
    entry_points={
        "console_scripts": [
            "dsv3-train = dsv3.train.__main__:main",
            "dsv3-launch = dsv3.launch.__main__:main",
        ],
    },
)
