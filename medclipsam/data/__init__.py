"""medclipsam.data"""
