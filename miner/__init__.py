"""aitbc.miner"""
