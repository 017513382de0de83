"""setuptools needs setup.py only to build cext's cffi modules (cffi_modules)."""
from setuptools import setup

setup(cffi_modules=["cext/build_btf.py:ffibuilder", "cext/build_bpf.py:ffibuilder"])
