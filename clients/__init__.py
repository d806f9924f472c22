"""aitbc.clients"""
