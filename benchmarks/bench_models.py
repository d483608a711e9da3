"""Whole-model CPU benchmark: torchvision's Mask R-CNN and Faster R-CNN (MobileNetV3) with
torchvision's RoIAlign and with roialign's (``roialign.patch_torchvision()``), alternating.

Examples:
    python benchmarks/bench_models.py                                  # both models, eval and train, 5 pairs
    python benchmarks/bench_models.py --threads 8 --csv models.csv --png models.png
    python benchmarks/bench_models.py --models mobilenet --modes eval --repeats 10
    python benchmarks/bench_models.py --smoke                          # tiny image: checks that it runs
"""

from roialign._bench_models import main

if __name__ == "__main__":
    main()
