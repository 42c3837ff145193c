"""medclipsam.models"""
