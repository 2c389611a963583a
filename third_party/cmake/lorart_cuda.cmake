# Decides whether the CUDA backend is built, from LORART_CUDA (AUTO/ON/OFF), and enables the CUDA
# language plus the CUDAToolkit targets when it is. Build glue only. A macro, not a function:
# enable_language() must run at file scope.
include(CheckLanguage)

macro(lorart_resolve_cuda out_var)
  string(TOUPPER "${LORART_CUDA}" _lorart_cuda_mode)
  if(NOT _lorart_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
    message(FATAL_ERROR "LORART_CUDA must be AUTO, ON or OFF, got '${LORART_CUDA}'")
  endif()
  if("${LORART_CUDA_ARCHS}" STREQUAL "native" OR "${LORART_CUDA_ARCHS}" STREQUAL "")
    message(FATAL_ERROR
      "LORART_CUDA_ARCHS must list explicit architectures (e.g. 90), got '${LORART_CUDA_ARCHS}'")
  endif()
  set(${out_var} OFF)
  if(NOT _lorart_cuda_mode STREQUAL "OFF")
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER)
      set(${out_var} ON)
    elseif(_lorart_cuda_mode STREQUAL "ON")
      message(FATAL_ERROR
        "LORART_CUDA=ON but no CUDA compiler (nvcc) was found; set CUDACXX or use LORART_CUDA=OFF")
    endif()
  endif()
  if(${out_var})
    set(CMAKE_CUDA_ARCHITECTURES "${LORART_CUDA_ARCHS}")
    set(CMAKE_CUDA_STANDARD 17)
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    message(STATUS "lorart: CUDA backend ON (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, archs ${LORART_CUDA_ARCHS})")
  else()
    message(STATUS "lorart: CUDA backend OFF (LORART_CUDA=${_lorart_cuda_mode})")
  endif()
endmacro()
