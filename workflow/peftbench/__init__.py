"""peftbench: benchmark parameter-efficient fine-tuning methods on GLUE.

Stages (each a subcommand of ``peftbench`` / ``python -m peftbench``): ``svd``, ``tokenize``,
``train``, ``aggregate``, ``significance``, ``plot``, ``summary``. See README.md.
"""
__version__ = "0.1.0"
