"""slimship.compress"""
