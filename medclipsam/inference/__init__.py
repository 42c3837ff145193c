"""medclipsam.inference"""
