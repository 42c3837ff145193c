"""medclipsam: CLIP-Guided SAM for 3D medical images, built on MONAI."""
from medclipsam.errors import InputError, MedClipSamError, OutputExistsError, UnknownConceptError, WeightsError

__version__ = "0.1.0"

__all__ = ["InputError", "MedClipSamError", "OutputExistsError", "UnknownConceptError", "WeightsError", "__version__"]
