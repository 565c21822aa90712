"""maskteacher: segment-everything fine-tuning of SAM-family students with a cached mask teacher."""

__version__ = "0.1.0"
