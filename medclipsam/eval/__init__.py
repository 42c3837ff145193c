"""medclipsam.eval"""
