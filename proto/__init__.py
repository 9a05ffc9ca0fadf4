"""splitserve.proto"""
