"""splitserve.cluster"""
