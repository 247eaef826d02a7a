"""covidcxr: open PyTorch toolkit for COVID-19 chest X-ray screening and severity grading.

For research use only. Not a medical device; no clinical performance is claimed.
"""

__version__ = "0.1.0"
