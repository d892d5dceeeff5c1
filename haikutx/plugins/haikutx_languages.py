"""
The built-in handler languages: Python and the stdio interpreters.
"""

from haikutx.languages.builtin import BUILTIN

# getPlugins finds every module-level object providing the interface.
(
    python,
    python3,
    bash,
    sh,
    node,
    ruby,
    perl,
    php,
    lua,
    tcl,
) = BUILTIN
