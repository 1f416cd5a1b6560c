"""Packaging for wxd. Runtime dependencies are deliberately few: see README "Dependencies"."""

from setuptools import find_packages, setup

setup(
    name="wxd",
    version="0.1.0",
    description="WeChat Official Account + Mini Program integration daemon",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["wxd", "wxd.*"]),
    install_requires=[
        "tornado>=6.2",
        "aiosqlite>=0.19",
        "xmltodict>=0.13",
        "pycryptodome>=3.18",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "hypothesis>=6",
            "wechatpy>=1.8",
            "ruff>=0.4",
            "mypy>=1.8",
        ],
        "bench": [
            "wechatpy>=1.8",
            "requests>=2",
        ],
    },
    entry_points={"console_scripts": ["wxd = wxd.cli:main"]},
)
