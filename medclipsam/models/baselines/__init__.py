"""medclipsam.models.baselines"""
