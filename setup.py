from setuptools import setup

# The C core is compiled by cffi; everything else is in pyproject.toml.
setup(cffi_modules=["src/kvcells/_ffi_build.py:ffibuilder"])
