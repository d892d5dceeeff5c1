"""
Packaging shim: C{twisted/plugins} must not have an C{__init__.py}, so
package discovery cannot see it; it is named beside every haikutx package.
The top-level C{samples/} directory is installed as C{haikutx/samples} so an
installed haikutx serves its bundled handlers.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["haikutx", "haikutx.*"])
    + ["twisted.plugins", "haikutx.samples"],
    package_dir={"haikutx.samples": "samples"},
    package_data={
        "haikutx": ["languages/boot.tcl"],
        "haikutx.samples": ["*"],
        "twisted.plugins": ["haikutx_plugin.py"],
    },
    include_package_data=False,
)
