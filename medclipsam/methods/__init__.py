"""Segmentation methods under one interface: CLIP-Guided SAM and the baselines it is compared with."""
