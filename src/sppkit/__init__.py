"""sppkit — Intel EPT-based Sub-Page write Protection (SPP) in Python.

``sppkit.arch`` is the processor model; ``sppkit.vmm`` the hypervisor side.
"""

__version__ = "0.1.0"
