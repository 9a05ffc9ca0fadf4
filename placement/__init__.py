"""splitserve.placement"""
