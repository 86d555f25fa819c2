"""xflex's benchmarks (run as modules from the checkout: ``python -m bench.selection_quality``);
``bench/tools`` holds the kernel investigation tools."""
