"""xflex's benchmarks (run as modules from the checkout: ``python -m bench.end_to_end``);
``bench/tools`` holds the kernel investigation tools."""
