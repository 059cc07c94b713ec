"""Generates the gRPC Python code from proto/ with grpcio-tools on every build (incl. editable)."""
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithProtos(build_py):
    def run(self):
        sys.path.insert(0, str(ROOT / "services"))
        from speccascade.protogen import generate

        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
