"""The build hook: canonical_schema.json is kept once, at the top of the repository
(the format specification; a checkout reads it there), and the build puts a copy
inside the installed ``converters`` package, where ``converters.format.schema`` finds it
when there is no checkout around it.  Everything else is in pyproject.toml."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

SCHEMA = "canonical_schema.json"


class BuildPyWithSchema(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:  # an editable install reads the checkout's file
            self.copy_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), SCHEMA),
                           os.path.join(self.build_lib, "converters", SCHEMA))

    def get_outputs(self, include_bytecode=True):
        extra = [] if self.editable_mode else [os.path.join(self.build_lib, "converters", SCHEMA)]
        return [*super().get_outputs(include_bytecode), *extra]


setup(cmdclass={"build_py": BuildPyWithSchema})
