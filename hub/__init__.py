"""aitbc.hub"""
