"""medclipsam.training"""
