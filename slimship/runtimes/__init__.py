"""slimship.runtimes"""
