"""medclipsam's MONAI Label app: request parsing, image sessions, transforms and the infer task."""
