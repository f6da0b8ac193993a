"""slimship.pipeline"""
