"""The hardware-abstraction layer: the interface platform plugins implement (``interface``)
and how the core finds them (``registry``). The plugins themselves are separate packages
(piston_cpu, piston_cuda, piston_tpu) that the core never imports by name."""
