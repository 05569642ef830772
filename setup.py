from setuptools import setup

setup(
    name="fastalign",
    version="0.1.0",
    packages=["fastalign", "fastalign.methods", "fastalign.kernels"],
    package_dir={"fastalign": "fastalign", "fastalign.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0", "transformers>=4.56", "numpy", "tqdm"],
    extras_require={"test": ["pytest"], "flash": ["flash-attn"]},
)
