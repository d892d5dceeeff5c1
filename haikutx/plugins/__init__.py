"""
Plugins of haikutx: a module here (or in C{haikutx/plugins/} of another
C{sys.path} entry, shipped without an C{__init__.py}) that provides
L{haikutx.interfaces.ILanguage} objects adds handler languages.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # type: ignore[name-defined]
__all__: list[str] = []
