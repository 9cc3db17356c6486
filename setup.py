from setuptools import setup

setup(cffi_modules=["unclaw_tui/engine/build.py:ffibuilder"])
