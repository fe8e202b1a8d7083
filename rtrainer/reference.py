# placeholder during build-out
from ._ref_layer import *  # noqa
from ._ref_misc import *  # noqa
from ._ref_model import *  # noqa
