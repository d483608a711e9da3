"""CPU benchmark of roialign against torchvision (when it imports) and onnxruntime.

Examples:
    python benchmarks/bench_cpu.py                                  # the four workloads, all cores
    python benchmarks/bench_cpu.py --threads 1,2 --dtypes float32,float64 --csv results.csv
    python benchmarks/bench_cpu.py --workloads sweep                # boxes 10..10,000 and channels
    python benchmarks/bench_cpu.py --op rotated                     # rotated RoIAlign, random angles
    python benchmarks/bench_cpu.py --op max                         # max-mode RoIAlign (mmcv's, ONNX's)
    python benchmarks/bench_cpu.py --op prroi                       # Precise RoI Pooling
"""

from roialign._bench import main

if __name__ == "__main__":
    main()
