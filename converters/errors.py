"""The one exception type the tool raises on purpose.

Every refusal is a ConvertError whose message names the file and, where there is one,
the tensor.  The CLI prints it as ``error: <message>`` and exits non-zero.
"""


class ConvertError(Exception):
    """A refusal or failure with a message meant for the user."""
