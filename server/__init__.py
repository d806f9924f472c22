"""aitbc.server"""
