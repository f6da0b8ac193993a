"""slimship.slimming"""
