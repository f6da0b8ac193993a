"""slimship.exporters"""
